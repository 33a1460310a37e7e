# transitional: the gallery reader lives in filip_contract.gallery_reader
from filip_contract.gallery_reader import Gallery, Segment  # noqa: F401
