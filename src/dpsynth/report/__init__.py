"""Building blocks of `dpsynth report`: the privacy statement in plain words
(`statement`) and the self-contained HTML page (`page`). The stage that reads
the other stages' outputs and assembles them is `dpsynth.stages.report`.
"""
