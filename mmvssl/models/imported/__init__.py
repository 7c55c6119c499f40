"""Released models as mmvssl models (`mmvssl models import`, docs/models.md): transformers' X-CLIP,
CLAP, VideoMAE, V-JEPA 2, TimeSformer, ViViT, CLIP and SigLIP, and open_clip, behind the interface
every command uses. sources.py: what each source is; model.py: ImportedModel and its towers;
build.py: import from a source, load from a folder; tokenizer.py; check.py: `--check`."""

from .build import import_source, is_imported, load_imported, read_folder_config
from .model import ImportedModel

__all__ = ["ImportedModel", "import_source", "is_imported", "load_imported", "read_folder_config"]
