"""The engine's view of a truly sparse weight: the primitives of
:class:`~dynsparse.sparse.storage.masked.SparseParam`, over a :class:`~dynsparse.sparse.layers.csr_linear.CSRWeight`.

Policies cannot tell the two apart. The differences stay here:

* drop-side handles are positions in the active list (the order of ``values``), so a drop score
  is a vector of ``num_active`` entries, never ``num_entries``;
* drops and grows are pending until :meth:`commit`, which moves the values, their gradient and
  the optimizer's per-entry state in one ``set_topology`` (survivors keep theirs, new entries
  start at zero, exactly what the masked storage leaves after re-masking);
* random growth draws the same entries as the masked storage from the same generator
  (:func:`~dynsparse.sparse.draws.choose_random_among_free`), and growth by dense scores sees
  the same scores: same seed and same scores, same topology;
* the dense gradient a policy reads off the mask (RigL, SNFS) comes from the products the
  weight captured while ``wants_dense_grad()`` held: RigL's scores are formed in blocks of rows at
  the update, never as one dense tensor; SNFS's momentum is dense by definition.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from dynsparse.errors import DynsparseError
from dynsparse.sparse.draws import choose_random_among_free, free_at, ranked_draws
from dynsparse.sparse.layers.csr_functions import GradientCapture, merge_sorted
from dynsparse.sparse.layers.csr_linear import CSRWeight
from dynsparse.sparse.storage import DenseScores, Dropped, FlatIndices, GrowScores, Handles
from dynsparse.sparse.storage.masked import EntryCounts

BLOCK_ENTRIES = 1 << 22  # rows of a dense gradient formed at once (16 MiB of float32)


def check_on_cpu(name: str, device: torch.device) -> None:
    """The CSR products run and were measured on the CPU only: anywhere else, one clear line."""
    if device.type != "cpu":
        raise DynsparseError(f"{name} is stored as CSR on {device}, but the CSR backend runs on the CPU only: use "
                             "backend='masked' (--sparse-backend masked) off the CPU, or --device cpu")


class RowScores(GrowScores):
    """Grow-side scores ``|dy^T x|`` of a captured gradient, formed a block of rows at a time."""

    def __init__(self, capture: GradientCapture, shape: tuple[int, int]) -> None:
        self.capture, self.shape = capture, shape

    def flat(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._mean(self.capture.dense_grad_rows(start, stop)).abs_().reshape(-1)

    def dense(self) -> torch.Tensor:
        return self._mean(self.capture.dense_grad_rows(0, self.shape[0])).view(self.shape)

    @staticmethod
    def _mean(block: torch.Tensor) -> torch.Tensor:
        # captured on this rank's batch: under several processes, the mean over ranks, as the
        # parameters' gradients are (every rank asks for the same blocks in the same order)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(block)
            block.div_(dist.get_world_size())
        return block


class CSRParam(EntryCounts):
    storage = "csr"
    label = "csr"
    granularity = 2
    slice_size = 1

    def __init__(self, name: str, weight: CSRWeight) -> None:
        self.name, self.weight = name, weight
        self._pending = 0  # entries grown minus dropped since the last commit
        self._alive: torch.Tensor | None = None  # bool per stored entry while drops are pending
        self._adds: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        # read from the weight: loading a checkpoint into the model resizes it behind our back
        return self.weight.num_active + self._pending

    @num_active.setter
    def num_active(self, value: int) -> None:
        self._pending = value - self.weight.num_active

    @property
    def param(self) -> torch.nn.Parameter:
        return self.weight.values

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.weight.shape)

    @property
    def device(self) -> torch.device:
        return self.weight.values.device

    @property
    def num_entries(self) -> int:
        return self.weight.num_entries

    def follow(self) -> None:
        """CSR storage is refused off the CPU (``model.to("cuda")`` after it was built)."""
        check_on_cpu(self.name, self.device)

    def alive(self) -> torch.Tensor:
        if self._alive is None:
            self._alive = torch.ones(self.weight.num_active, dtype=torch.bool, device=self.device)
        return self._alive

    def active_indices(self) -> Handles:
        return Handles(torch.arange(self.weight.num_active, device=self.device))

    # ---- scores (a stored-entry vector, or a dense one on the grow side) ----------------------
    def scores(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().abs().reshape(-1)

    def magnitude(self) -> torch.Tensor:
        return self.scores(self.param)

    def active_grad_scores(self) -> torch.Tensor | None:
        return None if self.param.grad is None else self.scores(self.param.grad)

    def dense_scores(self, t: torch.Tensor) -> GrowScores:
        return DenseScores(t.detach().abs().reshape(-1))

    def active_mean(self, scores: GrowScores) -> torch.Tensor:
        return scores.flat()[self.weight.active_flat()].sum() / max(self.num_active, 1)

    # ---- drop --------------------------------------------------------------------------------
    def drop(self, idx: Handles, count: int | None = None) -> Dropped:
        self.alive()[idx] = False
        self.num_active -= idx.numel() if count is None else count
        return Dropped(idx)

    def lowest_active(self, scores: torch.Tensor, count: int) -> Handles:
        if count <= 0:
            return Handles(torch.empty(0, dtype=torch.long, device=self.device))
        return Handles(torch.topk(self.fill_inactive(scores, math.inf), count, largest=False, sorted=False).indices)

    def active_below(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return self.only_active(scores < threshold)

    def largest_active(self, scores: torch.Tensor) -> Handles:
        return Handles(torch.argmax(self.fill_inactive(scores, -1.0)))

    def only_active(self, flags: torch.Tensor) -> torch.Tensor:
        return flags if self._alive is None else flags & self._alive

    def fill_inactive(self, scores: torch.Tensor, value: float) -> torch.Tensor:
        return scores.clone() if self._alive is None else scores.masked_fill(~self._alive, value)

    # ---- grow --------------------------------------------------------------------------------
    def _taken(self) -> torch.Tensor:
        """Sorted flat indices that cannot grow: every entry active before this change (the
        dropped ones included, as the policies exclude them) and those grown since."""
        taken = self.weight.active_flat()
        for flat, _ in self._adds:
            taken = merge_sorted(taken, torch.sort(flat).values)
        return taken

    def _capacity(self, exclude: Dropped | None) -> int:
        # only the count: the dropped entries are among ``_taken()`` already
        return self.num_free - (0 if exclude is None else exclude.count)

    def grow_random(self, count: int, exclude: Dropped | None, generator: torch.Generator) -> FlatIndices:
        capacity = self._capacity(exclude)
        count = min(count, capacity)
        return FlatIndices(choose_random_among_free(self.num_entries, self._taken(), count, generator, capacity))

    def grow_top(self, scores: GrowScores, count: int, exclude: Dropped | None) -> FlatIndices:
        count = min(count, self._capacity(exclude))
        if count <= 0:
            return FlatIndices(torch.empty(0, dtype=torch.long, device=self.device))
        taken = self._taken()
        if isinstance(scores, RowScores):
            return FlatIndices(self._grow_top_blocks(scores, count, taken))
        s = scores.flat().reshape(-1).clone()  # dense grow scores: the masked storage's exact rule
        s[taken] = -math.inf
        return FlatIndices(torch.topk(s, count, sorted=False).indices)

    def _grid(self) -> tuple[int, int]:
        """Rows and columns of the grow-side index (``row * cols + col`` is an entry's flat index)."""
        return self.weight.shape

    def _grow_top_blocks(self, scores: RowScores, count: int, taken: torch.Tensor) -> torch.Tensor:
        out_f, in_f = self._grid()
        rows = max(1, BLOCK_ENTRIES // in_f)
        best_v = torch.empty(0, device=self.device)
        best_i = torch.empty(0, dtype=torch.long, device=self.device)
        for a in range(0, out_f, rows):
            b = min(a + rows, out_f)
            block = scores.rows(a, b)
            lo, hi = torch.searchsorted(taken, torch.tensor([a * in_f, b * in_f], device=self.device)).tolist()
            block[taken[lo:hi] - a * in_f] = -math.inf
            v, i = torch.topk(block, min(count, block.numel()), sorted=False)
            best_v, best_i = torch.cat([best_v, v]), torch.cat([best_i, i + a * in_f])
            if best_v.numel() > count:
                best_v, keep = torch.topk(best_v, count, sorted=False)
                best_i = best_i[keep]
        return best_i[torch.isfinite(best_v)]

    def activate(self, flat: FlatIndices, values: torch.Tensor | None = None) -> None:
        if flat.numel():
            self._adds.append((flat.reshape(-1), None if values is None else values.reshape(-1)))
            self.num_active += flat.numel()

    def swap_random(self, drop: torch.Tensor, count: torch.Tensor, generator: torch.Generator,
                    new_std: float | None = None) -> torch.Tensor:
        """The masked storage's rule (same draws, same entries); CPU only, so counts may be read."""
        taken = self.weight.active_flat()
        bound = min(self.num_active, self.num_free)
        if bound == 0:
            return torch.zeros((), dtype=torch.long)
        idx, rank = ranked_draws(self.num_entries, bound, self.num_free, generator, self.device,
                                 lambda i: free_at(taken, i), lambda: self._free_all(taken))
        grown = torch.minimum(count, rank.max())
        take = (rank > 0) & (rank <= grown)
        values = None
        if new_std is not None:
            values = torch.randn(idx.numel(), generator=generator, device=generator.device)[take] * new_std
        k = int(grown)
        if k:
            self.drop(Handles(torch.nonzero(drop & (drop.cumsum(0) <= k)).view(-1)), k)
            self.activate(FlatIndices(idx[take]), values)
        return grown

    def _free_all(self, taken: torch.Tensor) -> torch.Tensor:
        free = torch.ones(self.num_entries, dtype=torch.bool, device=self.device)
        free[taken] = False
        return free

    def new_weights_std(self) -> float:
        return 1.0 / math.sqrt(self.weight.shape[1])

    @torch.no_grad()
    def commit(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Carry out the pending drops and grows: values, gradient and optimizer state move."""
        if self._alive is None and not self._adds:
            return
        keep = self.alive()
        flat = torch.cat([f for f, _ in self._adds]) if self._adds else keep.new_empty(0, dtype=torch.long)
        values = None
        if any(v is not None for _, v in self._adds):
            values = torch.cat([v if v is not None else torch.zeros(f.numel(), device=self.device)
                                for f, v in self._adds])
        expected = self.num_active
        self.weight.set_topology(keep, flat, values, optimizer)
        self._alive, self._adds, self._pending = None, [], 0
        if self.weight.num_active != expected:
            raise DynsparseError(f"{self.name}: {self.weight.num_active} entries after a change, expected {expected}")

    # ---- gradients off the stored entries -------------------------------------------------------
    def capture(self, want: Callable[[], bool]) -> None:
        """Keep (``want()``) or stop keeping the products' inputs for the next step's dense gradient."""
        if want():
            self.weight.capture_gradient()
        else:
            self.weight.release_gradient()

    @property
    def capturing(self) -> bool:
        return self.weight._capture is not None

    def off_topology_grad(self, g: torch.Tensor) -> torch.Tensor | None:
        return None  # nothing is stored off the active entries: the products are captured instead

    def note_grad(self, g: torch.Tensor) -> None:
        """A skipped step's captured products must not outlive its gradient (``accumulated``)."""
        if self.weight._capture is not None:
            self.weight._capture.accumulated(g)

    def scale_capture(self, factor: torch.Tensor) -> None:
        if self.weight._capture is not None:
            self.weight._capture.factor = factor

    def _row_scores(self) -> RowScores | None:
        capture = self.weight._capture
        return None if capture is None or not capture.pairs else RowScores(capture, self.weight.shape)

    def gradient_scores(self) -> GrowScores | None:
        return self._row_scores()

    def dense_gradient(self) -> torch.Tensor | None:
        scores = self._row_scores()  # (a conv weight's rows are [in * kh * kw]: shaped like the weight)
        return None if scores is None else scores.dense().view(self.shape)

    def dense_zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.param.dtype, device=self.device)

    # ---- DeepR: the gradient and signs of the stored values ------------------------------------
    @property
    def has_gradient(self) -> bool:
        return self.param.grad is not None

    def add_to_active_grad(self, values: torch.Tensor) -> None:
        g = self.param.grad
        if g is not None:
            idx = self.active_indices()
            g.index_put_(torch.unravel_index(idx, g.shape), values.to(g), accumulate=True)

    def signs(self) -> torch.Tensor:
        return torch.sign(self.param.detach()).to(torch.int8)

    def gather_flags(self, flags: torch.Tensor) -> torch.Tensor:
        return flags.reshape(-1)

    def state_for_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def state_from_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        return t

    # ---- masks: nothing is stored off the active entries ---------------------------------------
    def apply_(self) -> None:
        pass

    def apply_masks(self, optimizer: torch.optim.Optimizer | None) -> None:
        pass

    def mask_grad_(self, g: torch.Tensor) -> None:
        pass

    def off_mask_nonzero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.long, device=self.device)

    def nonzero(self) -> torch.Tensor:
        return self.param.detach().ne(0).sum()

    def masked_weight(self) -> torch.Tensor:
        return self.weight.to_dense()

    def nonzero_flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices and values of the stored entries that are nonzero (for export)."""
        keep = self.param.detach().ne(0)
        return self.weight.active_flat()[keep], self.param.detach()[keep]

    def to_sparse(self, layout: torch.layout) -> torch.Tensor:
        """From the stored entries: never a dense tensor (a conv weight's 4-D shape: COO only)."""
        if layout == torch.sparse_csr and len(self.shape) != 2:
            raise DynsparseError(f"torch.sparse_csr holds 2-D tensors; {self.name} has shape {tuple(self.shape)}: use "
                                 f"sparse_coo")
        flat, values = self.nonzero_flat()
        index = torch.stack(torch.unravel_index(flat, tuple(self.shape)))
        coo = torch.sparse_coo_tensor(index, values.clone(), tuple(self.shape), is_coalesced=True)
        return coo.to_sparse_csr() if layout == torch.sparse_csr else coo

    def holds(self, key: str, value: torch.Tensor) -> bool:
        return key.startswith(self.name + ".")  # values and index buffers of the module

    def export_as(self, key: str) -> str | None:
        return self.name if key == self.name + ".values" else None

    def compact_record(self, model_state: Mapping[str, Any]) -> dict[str, Any] | None:
        """The model's own crow/col indices say it: store nothing twice."""
        if self.name + ".crow_indices" not in model_state:
            return {}
        # a conv's CSR rows are [in * kh * kw] long; one mask entry may cover a whole kernel
        record: dict[str, Any] = {"storage": "csr", "in_features": int(self.weight.shape[1])}
        if self.slice_size > 1:
            record["slice"] = int(self.slice_size)
        return record

    @torch.no_grad()
    def load_values(self, dense: torch.Tensor) -> None:
        self.param.copy_(dense.reshape(-1)[self.weight.active_flat()])

    # ---- checkpoints -----------------------------------------------------------------------------
    def topology(self) -> torch.Tensor:
        """Sorted flat indices of the active entries (the masked storage saves a bool mask)."""
        return self.weight.active_flat()

    @torch.no_grad()
    def load_topology(self, saved: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make the active set ``saved`` (flat indices, or a bool mask of the weight's shape):
        entries that stay keep their values; new ones start at zero."""
        if saved.dtype == torch.bool:
            if saved.numel() != self.num_entries:
                raise DynsparseError(f"checkpoint mask of {self.name} has shape {tuple(saved.shape)}, "
                                     f"expected {tuple(self.shape)}")
            saved = torch.nonzero(saved.reshape(-1)).view(-1)
        flat = torch.sort(saved.to(self.device, torch.int64).view(-1)).values
        old = self.weight.active_flat()
        if torch.equal(old, flat):
            return
        keep = torch.isin(old, flat)
        self.weight.set_topology(keep, flat[~torch.isin(flat, old)], None, optimizer)
