"""Stand-in ``modules.call_queue``: the queue lock generation and model-running routes share."""
import threading

queue_lock = threading.Lock()
