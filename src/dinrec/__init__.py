"""dinrec: Deep Interest Network (DIN / DIEN) models around the reference `din_fcn_attention` unit."""

from dinrec.errors import DinrecError

__version__ = "0.1.0"

__all__ = ["DinrecError", "__version__"]
