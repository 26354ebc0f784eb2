"""Stub of the names Forge's backend imports from diffusers (none of them is used by the adapter)."""


class FlowMatchEulerDiscreteScheduler:
    pass
