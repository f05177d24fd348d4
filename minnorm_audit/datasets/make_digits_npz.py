"""Regenerate ``digits.npz`` from scikit-learn's bundled copy of the UCI digits.

Run once by a maintainer, never at run time (scikit-learn is not a runtime
dependency)::

    python -m minnorm_audit.datasets.make_digits_npz

The archive holds ``images`` (uint8, shape (1797, 8, 8), values 0..16) and
``labels`` (uint8, shape (1797,), values 0..9), in scikit-learn's order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIGITS_PATH = Path(__file__).with_name("digits.npz")


def main(output_path: Path = DIGITS_PATH) -> None:
    """Write the digits archive to ``output_path``.

    Parameters
    ----------
    output_path : Path, default=the ``digits.npz`` beside this script
    """
    from sklearn.datasets import load_digits  # imported here: only this script needs sklearn

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    # The source values are integer counts 0..16 stored as float64; the cast must be exact.
    assert np.array_equal(images, digits.images) and images.max() <= 16
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    np.savez_compressed(output_path, images=images, labels=labels)
    print(f"wrote {output_path} ({output_path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
