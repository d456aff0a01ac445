"""``python -m lnconvert.zoo NAME RESULT_JSON OPTIONS_JSON``: one model's row (the runner's child)."""
import sys

from ..errors import LnConvertError
from .child import child_main

try:
    sys.exit(child_main(sys.argv[1:]))
except LnConvertError as exc:  # a bad argument to the child (the parent never sends one)
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
