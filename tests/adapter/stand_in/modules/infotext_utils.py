"""Stand-in for the webui's ``modules.infotext_utils`` (v1.10.1), written for the adapter tests.

Reproduces the parts our adapter and its tests touch: ``PasteField``, ``quote`` / ``unquote``,
``parse_generation_parameters`` (prompt, negative prompt and the ``key: value`` line; none of the webui's
back-compat defaults or style extraction), and :func:`paste_values`, which applies ``infotext_fields`` to a
parsed infotext with the same per-component conversion as the webui's paste button (``type(component.value)``,
``"False"`` for booleans, ints through float). ``apply_api_infotext`` mimics the API's ``infotext`` request
field for script args (``target_type(value)`` conversion, no ``infotext_pasted`` callbacks).
"""
import json
import re

import gradio as gr

# key: word char then word chars / spaces / '-' / '/'; value: a JSON string literal, or up to the next comma
re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")
type_of_gr_update = type(gr.update())


class PasteField(tuple):
    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


paste_fields = {}
registered_param_bindings = []


def quote(text):
    s = str(text)
    if "," in s or "\n" in s or ":" in s:
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text):
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x, skip_fields=None):
    res = {}
    lines = x.strip().split("\n")
    last = lines.pop()
    if len(re_param.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    for k, v in re_param.findall(last):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res["Prompt"] = "\n".join(prompt)
    res["Negative prompt"] = "\n".join(negative)
    for key in skip_fields or ():
        res.pop(key, None)
    return res


def _convert(component, v):
    valtype = type(component.value)
    if valtype == bool and v == "False":
        return False
    if valtype == int:
        return float(v)
    return valtype(v)


def paste_values(fields, params):
    """What the paste button sends to each field's component: a value, or ``None`` for "unchanged"."""
    out = []
    for component, key in fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            out.append(None)
        elif isinstance(v, type_of_gr_update):
            out.append(v.get("value"))
        else:
            try:
                out.append(_convert(component, v))
            except Exception:
                out.append(None)
    return out


def apply_api_infotext(fields, params):
    """Script-arg values the API derives from ``infotext`` (None: not mentioned)."""
    out = []
    for field in fields:
        field = field if isinstance(field, PasteField) else PasteField(*field)
        value = field.function(params) if field.function else params.get(field.label)
        target_type = type(field.component.value)
        if value is None or target_type == type(None):
            out.append(None)
            continue
        if isinstance(value, dict) and value.get("__type__") == "generic_update":
            value = value.get("value")
        if value is not None and not isinstance(value, target_type):
            value = target_type(value)
        out.append(value)
    return out
