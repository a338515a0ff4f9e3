"""Write dynsparse's experiment lists (run from the repository root: python experiments/make_lists.py).

* mnist_lenet300.yaml -- designed by us (the original shipped no MNIST list): LeNet-300-100 with
  BN, batch 50, 20 epochs, ``mnist_schedule.yaml``; dense, static, gradual pruning (from the
  dense run of the same seed), DSR, SET, DeepR, tied, RigL and SNFS at sparsities 0.9 ... 0.99,
  3 seeds; then RigL and static with the ERK budget, and SNFS and DSR without batch norm, at 0.98
  and 0.99.
  DSR reallocates Np = 600 entries per 100 iterations; SET's fraction equals 600 / nonzeros, so
  both move the same number of parameters (the original's rule for its SET fractions).
* mnist_sparse_learning_protocol.yaml -- DSR, SET, DeepR and SNFS under sparse_learning's own MNIST
  protocol, the one behind the published MNIST numbers (see docs/mnist/README.md).
* wrn28_2_cifar10.yaml, resnet50_imagenet.yaml -- the original lists' jobs with the same
  hyperparameters, as ``dynsparse train`` lines (job 68's split schedule path joined).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

HERE = Path(__file__).parent
SPARSITIES = (0.9, 0.95, 0.97, 0.98, 0.99)
SEEDS = (0, 1, 2)
SPARSE_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10
BASE = "dynsparse train --model mnist_mlp -b 50 --epochs 20 --no-validate-train --schedule-file mnist_schedule.yaml"

METHODS = {
    "static": lambda s: "",
    "dsr": lambda s: "--rewire --threshold-prune --rewire-scaling --n-prune-params 600",
    "set": lambda s: f"--rewire --rewire-fraction {600 / (SPARSE_WEIGHTS * (1 - s)):.4f}",
    "deepr": lambda s: "--DeepR --DeepR_eta 0.01 --L1-loss-coeff 1.0e-5 --weight-decay 0.0",
    "tied": lambda s: "--tied",
}
# issue 7's successors come after the original methods, so the indices of the jobs above stay put
SUCCESSORS = {
    "rigl": lambda s: "--rigl",  # drop fraction 0.3, cosine-decayed, every 100 steps until 75% of training
    "snfs": lambda s: "--sparse-momentum",  # prune rate 0.5, cosine-decayed, once per epoch until 75%
}
# then the ERK budget (issue 7) for the methods whose per-layer densities stay fixed, where the
# per-type budget starves the 10x100 output layer
ERK = {
    "rigl": lambda s: "--rigl --budget erk",
    "static": lambda s: "--budget erk",
}
# then SNFS and DSR on the MLP without batch norm (sparse_learning's LeNet-300-100 has none): with
# BN after every layer SNFS's mean-momentum redistribution starves the first layer
NO_BN = {
    "snfs": lambda s: "--sparse-momentum --no-batch-norm",
    "dsr": lambda s: f"{METHODS['dsr'](s)} --no-batch-norm",
}


def mnist_jobs() -> list[str]:
    jobs = []
    for seed in SEEDS:
        jobs.append(f"{BASE} --initial-sparsity-fc 0.0 --seed {seed} --name mnist_dense_s{seed}")
    for s in SPARSITIES:
        for seed in SEEDS:
            for method, flags in METHODS.items():
                jobs.append(f"{BASE} --initial-sparsity-fc {s} {flags(s)} --seed {seed} --name "
                            f"mnist_{method}_{s}_s{seed}")
            jobs.append(f"{BASE.replace('mnist_schedule', 'mnist_prune_schedule')} --initial-sparsity-fc 0.0 --prune "
                        f"--prune-target-sparsity-fc {s} --prune-iterations 10 --prune-epoch-frequency 1 "
                        f"--start-pruning-after-epoch 0 --post-prune-epochs 11 --cubic-prune-schedule "
                        f"--resume runs/mnist_dense_s{seed} --seed {seed} --name mnist_prune_{s}_s{seed}")
    for s in SPARSITIES:
        for seed in SEEDS:
            for method, flags in SUCCESSORS.items():
                jobs.append(f"{BASE} --initial-sparsity-fc {s} {flags(s)} --seed {seed} --name "
                            f"mnist_{method}_{s}_s{seed}")
    for s in (0.98, 0.99):
        for seed in SEEDS:
            for method, flags in ERK.items():
                jobs.append(f"{BASE} --initial-sparsity-fc {s} {flags(s)} --seed {seed} --name "
                            f"mnist_{method}_erk_{s}_s{seed}")
    for s in (0.98, 0.99):
        for seed in SEEDS:
            for method, flags in NO_BN.items():
                jobs.append(f"{BASE} --initial-sparsity-fc {s} {flags(s)} --seed {seed} --name "
                            f"mnist_{method}_nobn_{s}_s{seed}")
    return [" ".join(j.split()) + f" --job-idx {i}" for i, j in enumerate(jobs)]


# sparse_learning's MNIST protocol (the source of the "published" MNIST numbers; issue 11): LeNet-300-100
# without batch norm, batch 100, 100 epochs, SGD Nesterov momentum 0.9, weight decay 5e-4 (DeepR: 0 and
# L1 1e-5, as in the original's DeepR jobs), lr 0.1 x0.1 every 25,000 steps, the same density in every
# layer. SNFS as sparse_learning runs it: prune rate 0.5 cosine-decayed over the whole run, updated at
# the end of every epoch. DSR/SET/DeepR keep the settings of mnist_lenet300.yaml (Np 600 every 100 steps).
SL_BASE = ("dynsparse train --model mnist_mlp --no-batch-norm -b 100 --epochs 100 --no-validate-train "
           "--weight-decay 5e-4 --schedule-file experiments/learning_schedules/sparse_learning_mnist.yaml")
SL_METHODS = {
    "dsr": lambda s: METHODS["dsr"](s),
    "set": lambda s: METHODS["set"](s),
    "deepr": lambda s: METHODS["deepr"](s).replace("--weight-decay 0.0", "--weight-decay 0"),
    "snfs": lambda s: "--sparse-momentum --update-end 1.0",
}
SL_SPARSITIES = (0.99, 0.98, 0.97, 0.95, 0.9)  # the highest first: there the deltas were largest


def sparse_learning_jobs() -> list[str]:
    jobs = []
    for seed in SEEDS:
        for s in SL_SPARSITIES:
            for method, flags in SL_METHODS.items():
                jobs.append(f"{SL_BASE} --initial-sparsity-fc {s} {flags(s)} --seed {seed} --name "
                            f"mnist_sl_{method}_{s}_s{seed}")
    return [" ".join(j.split()) + f" --job-idx {i}" for i, j in enumerate(jobs)]


# The wide-versus-narrow study (issue 14, docs/truly_sparse.md): the dense LeNet-300-100 against
# 784-W-W-10 MLPs with the same learnable parameters (267,020 with batch norm: 266,200 weights +
# 820 norm parameters), trained with DSR and SET on the CSR backend, on MNIST and Fashion-MNIST.
WIDE_BASE = ("dynsparse train --model mnist_mlp -b 100 --epochs 10 --no-validate-train "
             "--schedule-file experiments/learning_schedules/wide_vs_narrow.yaml")
DENSE_LEARNABLE = 784 * 300 + 300 * 100 + 100 * 10 + 2 * (300 + 100 + 10)


def wide_sparsity(width: int) -> tuple[float, int]:
    """The sparsity giving a 784-W-W-10 MLP (with BN) the dense LeNet's learnable parameters, and
    its active weights."""
    weights = 784 * width + width * width + width * 10
    active = DENSE_LEARNABLE - 2 * (2 * width + 10)
    return round(1 - active / weights, 5), active


def wide_sparse_jobs(dataset: str, width: int, seed: int) -> list[str]:
    """DSR and SET on 784-width-width-10 at the dense LeNet's parameter count, CSR backend."""
    s, active = wide_sparsity(width)
    flags = {"dsr": METHODS["dsr"](s), "set": f"--rewire --rewire-fraction {600 / active:.4f}"}
    return [f"{WIDE_BASE} --dataset {dataset} --hidden-sizes {width},{width} --initial-sparsity-fc {s} {f} "
            f"--sparse-backend csr --seed {seed} --name wide_{dataset}_{method}{width}_s{seed}"
            for method, f in flags.items()]


def wide_jobs() -> list[str]:
    jobs = []
    for seed in range(3):
        for dataset in ("mnist", "fashion_mnist"):
            jobs.append(f"{WIDE_BASE} --dataset {dataset} --initial-sparsity-fc 0.0 --seed {seed} "
                        f"--name wide_{dataset}_dense300-100_s{seed}")
            jobs += wide_sparse_jobs(dataset, 1000, seed)
    # then a wider net, one seed (a 784-3000-3000-10 epoch costs ~2x the 1000-wide one on CSR)
    for dataset in ("mnist", "fashion_mnist"):
        jobs += wide_sparse_jobs(dataset, 3000, 0)
    return jobs


def from_original(name: str) -> list[str]:
    lines = yaml.safe_load((HERE / "original" / name).read_text())["jobs"]
    out = []
    for line in lines:
        line = line.replace("./learning_schedules/ wrnet_schedule.yaml", "./learning_schedules/wrnet_schedule.yaml")
        argv = shlex.split(line)
        out.append(" ".join(["dynsparse", "train", *argv[2:]]))
    return out


def write(name: str, header: str, jobs: list[str]) -> None:
    text = header + "jobs:\n" + "".join(f"  - {j}\n" for j in jobs)
    (HERE / name).write_text(text)
    print(f"wrote {name}: {len(jobs)} jobs")


if __name__ == "__main__":
    write("mnist_lenet300.yaml", "# Generated by experiments/make_lists.py: LeNet-300-100 on MNIST, every method at\n"
          "# sparsities 0.9-0.99 with 3 seeds. Run: dynsparse sweep experiments/mnist_lenet300.yaml -- --data DIR\n",
          mnist_jobs())
    write("mnist_sparse_learning_protocol.yaml",
          "# Generated by experiments/make_lists.py: DSR, SET, DeepR and SNFS under sparse_learning's MNIST\n"
          "# protocol (LeNet-300-100 without BN, batch 100, 100 epochs, wd 5e-4, lr /10 every 25k steps).\n"
          "# Seed-major: a prefix of the list is every method and sparsity for the first seeds.\n"
          "# Run: dynsparse sweep experiments/mnist_sparse_learning_protocol.yaml -- --data DIR\n",
          sparse_learning_jobs())
    write("wide_vs_narrow.yaml",
          "# Generated by experiments/make_lists.py: the dense LeNet-300-100 against wide sparse MLPs with as\n"
          "# many learnable parameters (DSR, SET; CSR backend) on MNIST and Fashion-MNIST, 3 seeds, seed-major.\n"
          "# Run: dynsparse sweep experiments/wide_vs_narrow.yaml -- --data DIR (DIR holding MNIST/ and "
          "FashionMNIST/)\n",
          wide_jobs())
    write("wrn28_2_cifar10.yaml", "# Generated by experiments/make_lists.py from original/wrnet_experiments.yaml\n"
          "# (same jobs and hyperparameters). Run: dynsparse sweep experiments/wrn28_2_cifar10.yaml -- --data DIR\n",
          from_original("wrnet_experiments.yaml"))
    write("resnet50_imagenet.yaml", "# Generated by experiments/make_lists.py from original/resnet_experiments.yaml\n"
          "# (same jobs and hyperparameters). Run: dynsparse sweep experiments/resnet50_imagenet.yaml -- --data DIR\n",
          from_original("resnet_experiments.yaml"))
