"""The examples' progress bar: tqdm when installed (the 'demo' and 'examples' extras), else a plain one-line bar."""

from __future__ import annotations

from typing import Iterable, Iterator


def progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, ncols=90)
    except ImportError:
        return _plain_bar(iterable, total, desc)


def _plain_bar(iterable: Iterable, total: int, desc: str) -> Iterator:
    for i, item in enumerate(iterable, 1):
        if i == total or i % max(1, total // 20) == 0:
            print(f"\r{desc}: {'#' * (20 * i // total):<20} {i}/{total}", end="", flush=True)
        yield item
    print("\r" + " " * 60 + "\r", end="")
