"""ipywidgets builders: each only wires a pure compute function to a plot function (no logic here)."""

from __future__ import annotations

import ipywidgets as widgets
