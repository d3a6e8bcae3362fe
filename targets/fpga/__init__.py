"""The FPGA target (docs/fpga.md): a streaming dataflow accelerator of the fused bit layers, FINN-style.

hls.py      Vitis HLS C++ (one stage per layer: MVAU with PE x SIMD folding, thresholds, sliding window, pools)
project.py  the project folder (sources, testbench, vectors, Tcl, RTL, report) and the g++ C simulation
folding.py  PE/SIMD per layer for a frame rate on a part's budget; parts.py: the parts' budgets
estimate.py MVAU cycles and resources; rtl.py: the SystemVerilog MVAU; qonnx_export.py: QONNX for FINN
"""
