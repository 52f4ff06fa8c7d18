"""Side-by-side benchmarks of fxpeft against PEFT and against the base model without adapters.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--help`` for the options); results go to
``benchmarks/results/<date>.{json,md,png}``. Modules, one concern each:

- ``workloads``: the models, data and LoRA settings every contender shares;
- ``contenders``: base / PEFT / fxpeft, eager or compiled, built through each library's public API;
- ``timing``: interleaved repetitions, medians with min and max, paired ratios;
- ``isolated``: measurements in a fresh process (peak RSS, cold time to the first step, the 7B plan);
- ``comparisons``: what is compared, and the targets each comparison decides;
- ``report``: JSON, Markdown and the PNG chart.

This package is not part of the test suite, and imports nothing heavy here (children import it too).
"""
