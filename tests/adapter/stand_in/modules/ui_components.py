"""Stand-in for the webui's ``modules.ui_components`` (v1.10.1): the gradio helpers extensions build on.

Written for the adapter tests, not copied: only the behaviour our UI relies on is reproduced.
``InputAccordion`` is a hidden ``gr.Checkbox`` (its value = the accordion is open = the feature is enabled)
that opens a ``gr.Accordion`` as a context manager; the ``Form*`` classes are plain gradio layouts.
"""
import gradio as gr


class FormComponent:
    def get_expected_parent(self):
        return gr.components.Form


class ToolButton(FormComponent, gr.Button):
    """A small button (one emoji) that fits in a form row."""

    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        if isinstance(classes, str):
            classes = [classes]
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"


class FormRow(FormComponent, gr.Row):
    def get_block_name(self):
        return "row"


class FormColumn(FormComponent, gr.Column):
    def get_block_name(self):
        return "column"


class FormGroup(FormComponent, gr.Group):
    def get_block_name(self):
        return "group"


class FormHTML(FormComponent, gr.HTML):
    def get_block_name(self):
        return "html"


class InputAccordion(gr.Checkbox):
    """An accordion usable as a script input: a hidden checkbox whose value follows the open state."""

    _counter = 0

    def __init__(self, value, **kwargs):
        accordion_id = kwargs.get("elem_id")
        if accordion_id is None:
            accordion_id = f"input-accordion-{InputAccordion._counter}"
            InputAccordion._counter += 1
        self.accordion_id = accordion_id
        checkbox_kwargs = dict(kwargs, elem_id=f"{accordion_id}-checkbox", visible=False)
        super().__init__(value, **checkbox_kwargs)
        accordion_kwargs = dict(kwargs, elem_id=accordion_id, label=kwargs.get("label", "Accordion"),
                                elem_classes=["input-accordion"], open=value)
        self.accordion = gr.Accordion(**accordion_kwargs)

    def extra(self):
        return gr.Column(elem_id=f"{self.accordion_id}-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
