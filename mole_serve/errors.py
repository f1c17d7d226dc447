"""The one exception type for bad adapters: it names the adapter, the item, expected vs found."""


class AdapterError(ValueError):
    """A MoLE adapter that cannot be served as it is.

    `item` is a tensor name (`mixlora.layers.0.mlp.moe_gate.weight`) or a config field
    (`adapter_config.json:top_k`); the server turns this into an HTTP 400 for that adapter
    and keeps serving the others.
    """

    def __init__(self, adapter: str, item: str, expected: str, found: str):
        self.adapter, self.item, self.expected, self.found = adapter, item, expected, found
        super().__init__(f"adapter {adapter!r}: {item}: expected {expected}, found {found}")
