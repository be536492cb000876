"""The only place that imports Qt (through qtpy) and magicgui. Nothing here is imported by the engine."""
