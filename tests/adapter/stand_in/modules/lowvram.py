"""Stand-in ``modules.lowvram``: counts calls of ``send_everything_to_cpu``."""
send_calls = 0


def send_everything_to_cpu():
    global send_calls
    send_calls += 1


def is_enabled(sd_model):
    return bool(getattr(sd_model, "lowvram", False))
