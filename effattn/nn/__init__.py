"""Drop-in attention modules (see :mod:`effattn.nn.sparse` and :mod:`effattn.nn.xl`)."""

from effattn.nn.decoding import SparseCache  # noqa: F401
from effattn.nn.sparse import SparseMultiheadAttention, replace_attention  # noqa: F401
from effattn.nn.xl import XLMultiheadAttention, convert_transformer_xl  # noqa: F401
