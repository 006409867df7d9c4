"""Data sets of the recipe: the row schemas (``formats``), where rows come from
(``sources``) and the synthetic visual-math generator (``synthetic``).

Other stages use::

    from visionr1_trainer.data import read_rl, read_cold, read_bridge_source
    result = read_rl(config.data, storage=config.storage)   # ReadResult[RLExample]
    result.items[0].load_images()                             # [PIL.Image (RGB)]
    result.skipped                                            # Counter: reason -> rows
"""

from .formats import (
    IMAGE_PLACEHOLDER,
    RESPONSE_TEMPLATE,
    SKIP_REASONS,
    BridgeExample,
    ColdExample,
    ReadResult,
    RLExample,
    bridge_row,
    cold_row,
    format_response,
    read_bridge_source,
    read_cold,
    read_dataset,
    read_rl,
    rl_row,
    write_rows,
)
from .sources import DataSourceError

__all__ = [
    "IMAGE_PLACEHOLDER", "RESPONSE_TEMPLATE", "SKIP_REASONS", "BridgeExample", "ColdExample",
    "DataSourceError", "ReadResult", "RLExample", "bridge_row", "cold_row", "format_response",
    "read_bridge_source", "read_cold", "read_dataset", "read_rl", "rl_row", "write_rows",
]
