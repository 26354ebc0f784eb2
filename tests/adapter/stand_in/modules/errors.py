"""Stand-in ``modules.errors``: ``report`` records instead of printing (the runner swallows exceptions)."""
import sys
import traceback

reported = []


def report(message, *, exc_info=False):
    error = sys.exc_info()[1] if exc_info else None
    reported.append((message, error))
    print(message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e, task, *, full_traceback=False):
    reported.append((task, e))


def run(code, task):
    try:
        code()
    except Exception as e:  # noqa: BLE001
        display(e, task)
