"""A message's array read where it lies, in the message's own bytes.

Flower carries each array as the bytes of a ``.npy`` file, and ``Array.numpy()`` reads them with
``np.load``, which copies every value out. The server reads each reply once (to check it, then to
write it into its row of the round's stack or add it into a running sum), so that copy is pure
overhead: for a MiniLM reply its largest tensor (the word embeddings) is 47 MB, half a payload held
twice at the moment the server's memory peaks. Here the values are a read-only view of the
message's bytes instead; any image ``np.load`` would read differently (Fortran order, object
dtypes, a header version this does not know) is read by ``Array.numpy()`` as before.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from flwr.app import Array

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def array_in_place(array: Array) -> np.ndarray:
    """The array's values without copying them out of its message (read-only); raises ValueError or
    TypeError, as ``Array.numpy()`` does, on bytes that are not an array."""
    if array.stype != "numpy.ndarray":
        return array.numpy()  # raises Flower's own TypeError
    header = io.BytesIO(array.data)
    version = np.lib.format.read_magic(header)
    read_header = _HEADER_READERS.get(version)
    if read_header is None:
        return array.numpy()
    shape, fortran_order, dtype = read_header(header)
    if fortran_order or dtype.hasobject:
        return array.numpy()
    count = math.prod(shape)
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=header.tell()).reshape(shape)


def tensor_in_place(array: Array) -> torch.Tensor:
    """:func:`array_in_place` as a torch tensor sharing the message's bytes: only to be read."""
    values = array_in_place(array)
    with warnings.catch_warnings():  # torch warns that the bytes are read-only: they are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)
