"""`python -m palisade.references`: rewrite the reference pages in docs/ from the code."""

from __future__ import annotations

from palisade._private.references import write_pages


def main() -> None:
    changed = write_pages()
    print("rewrote " + ", ".join(f"docs/{name}" for name in changed) if changed else "up to date")


if __name__ == "__main__":
    main()
