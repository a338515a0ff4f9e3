"""``python main.py FLAGS``: the original entry point, the same as ``dynsparse train FLAGS``."""
import sys

from dynsparse.cli.commands import original_main

if __name__ == "__main__":
    sys.exit(original_main())
