"""The commands: orchestrators of the stages (load → trace → score → cut / factor → verify → measure / report).

Each command has a ``run`` that the CLI calls with its options and a staging area for its files, and a
keyword-argument function of the same name that the Python API exports (``prunetool.shrink`` and so on).
They share one start (:func:`common.start`: load, data, calibration samples, trace) and one end
(:func:`common.finish`: record, save, reload check, ONNX / pt2, measure, report).
"""
