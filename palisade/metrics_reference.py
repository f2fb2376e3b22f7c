"""`python -m palisade.metrics_reference`: rewrite docs/metrics.md from the code."""

from __future__ import annotations

from pathlib import Path

from palisade._private.metrics_reference import metrics_reference

PAGE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def main() -> None:
    text = metrics_reference()
    if PAGE.exists() and PAGE.read_text() == text:
        print("docs/metrics.md is up to date")
        return
    PAGE.write_text(text)
    print("rewrote docs/metrics.md")


if __name__ == "__main__":
    main()
