"""X/Y/Z plot axes (cd_webui.xyz) against a stand-in of the webui's scripts/xyz_grid.py module."""
from __future__ import annotations

import ast
import sys
import types
from collections import namedtuple
from copy import copy

import pytest

from cd_webui import xyz
from cd_webui.args import parse_script_args
from conftest import real_webui_path
from lib_colorize.errors import InvalidInput
from lib_colorize.options import FIELD_BY_NAME, ColorizeOptions, LevelScales

ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])


def make_xyz_module():
    """What our code touches of xyz_grid.py: AxisOption(label, type, apply, format_value, confirm, cost,
    choices, prepare), axis_options, and a Script class whose module is named "xyz_grid.py"."""
    module = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None,
                     prepare=None):
            self.label, self.type, self.apply = label, type, apply
            self.format_value, self.confirm, self.cost = format_value, confirm, cost
            self.choices, self.prepare = choices, prepare

    class Script:
        pass

    Script.__module__ = "xyz_grid.py"
    module.AxisOption = AxisOption
    module.Script = Script
    module.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None),
                           AxisOption("Seed", int, lambda p, x, xs: setattr(p, "seed", x))]
    return module


@pytest.fixture
def scripts_data(monkeypatch):
    """A ``modules.scripts`` whose ``scripts_data`` we control."""
    import modules

    fake = types.ModuleType("modules.scripts")
    fake.scripts_data = []
    monkeypatch.setitem(sys.modules, "modules.scripts", fake)
    monkeypatch.setattr(modules, "scripts", fake, raising=False)
    return fake.scripts_data


def test_registers_once(scripts_data):
    module = make_xyz_module()
    scripts_data.append(ScriptClassData(module.Script, "xyz_grid.py", "/webui", module))
    assert xyz.find_xyz_module() is module
    added = xyz.register_xyz_axes()
    labels = [o.label for o in module.axis_options]
    assert added == len(xyz.axis_labels()) == 27       # 23 SD2.1/enhance axes, then the 4 XL sketch strengths
    assert labels[:2] == ["Nothing", "Seed"] and labels[2:] == xyz.axis_labels()
    assert xyz.register_xyz_axes() == 0 and xyz.register_xyz_axes(module) == 0
    assert [o.label for o in module.axis_options] == labels
    # a re-imported X/Y/Z module (Reload UI) gets its own axes
    fresh = make_xyz_module()
    assert xyz.register_xyz_axes(fresh) == 27


def test_no_xyz_is_a_no_op(scripts_data):
    assert xyz.find_xyz_module() is None
    assert xyz.register_xyz_axes() == 0
    assert xyz.register_xyz_axes(types.ModuleType("other")) == 0


def test_labels_and_ranges_come_from_the_field_table():
    labels = xyz.axis_labels()
    assert "[ColorizeDiffusion] " + FIELD_BY_NAME["reference_guidance"].label in labels
    assert "[ColorizeDiffusion] " + FIELD_BY_NAME["injection"].label in labels
    assert len(set(labels)) == len(labels)


def axes_by_label():
    module = make_xyz_module()
    xyz.register_xyz_axes(module)
    return {o.label.removeprefix(xyz.AXIS_PREFIX): o for o in module.axis_options}


def test_axes_set_overrides_that_parsing_prefers():
    axes = axes_by_label()
    base = types.SimpleNamespace(seed=1)
    p = copy(base)
    for label, value in ((FIELD_BY_NAME["reference_guidance"].label, 9.5),
                         (FIELD_BY_NAME["sketch_strength"].label, 0.4),
                         (FIELD_BY_NAME["guidance_end"].label, 0.8),
                         (FIELD_BY_NAME["injection_start"].label, 0.3),
                         ("Middle-resolution scale (colour)", 0.2)):
        axis = axes[label]
        value = axis.type(value)
        axis.confirm(p, [value])
        axis.apply(p, value, [value])
    injection = axes[FIELD_BY_NAME["injection"].label]
    assert injection.choices() == ["False", "True"]
    injection.apply(p, "True", ["False", "True"])
    assert p.cd_reference_guidance == 9.5 and p.cd_level_scales_middle == 0.2 and p.cd_injection is True
    assert not hasattr(base, "cd_reference_guidance")
    got = parse_script_args([{"enabled": True, "reference_guidance": 3.0, "injection": False}], p,
                            require_sketch=False)
    assert got == ColorizeOptions(enabled=True, reference_guidance=9.5, sketch_strength=0.4, guidance_end=0.8,
                                  injection=True, injection_start=0.3, level_scales=LevelScales(1.0, 0.2, 1.0))


@pytest.mark.parametrize("label,values,field", [
    ("Reference guidance scale", [5.0, 20.0], "reference_guidance"),
    ("Sketch strength", [-1.0], "sketch_strength"),
    ("Encoder scale", [1.5], "level_scales.encoder"),
    ("Attention injection", ["True", "maybe"], "injection"),
])
def test_confirm_rejects_values_out_of_range(label, values, field):
    axis = axes_by_label()[label]
    with pytest.raises(InvalidInput) as error:
        axis.confirm(types.SimpleNamespace(), values)
    assert error.value.field == field


def test_real_axis_option_signature():
    tree = ast.parse(real_webui_path("scripts/xyz_grid.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AxisOption")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    names = [a.arg for a in init.args.args]
    assert names[:4] == ["self", "label", "type", "apply"]
    assert {"confirm", "choices"} <= set(names)
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "axis_options" for t in n.targets)
               for n in tree.body)
