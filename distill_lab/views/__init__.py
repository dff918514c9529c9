"""Lesson views: the numbers a widget or a figure shows, computed from a model or a tensor.

A view returns plain data (dicts, lists, tensors); ``distill_lab.plotting`` draws it and
``distill_lab.widgets`` wires it to knobs. No technique module imports a view.
"""
