"""``python -m lnconvert ...`` (what ``torchrun -m lnconvert ...`` starts on every rank)."""
from .cli import main

if __name__ == "__main__":
    main()
