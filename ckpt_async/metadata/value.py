"""The metadata of one stored value (Orbax's ``ocp.metadata.value``): the leaves of the trees
``metadata()`` and ``item_metadata()`` return."""

from . import ArrayMetadata, Metadata, ScalarMetadata, StorageMetadata, StringMetadata

__all__ = ["ArrayMetadata", "Metadata", "ScalarMetadata", "StorageMetadata", "StringMetadata"]
