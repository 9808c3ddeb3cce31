"""The demo: a world that the library trains on when there is no real data, and an experiment driving the whole
pipeline over it. Not part of the library proper: `ml/` reads data in ml/examples.py's formats; this is one source.

- world.py: the demo world's facts, corpus, dialogues, prompts, gold scorer and simulated annotators
  (python -m ml.demo.world);
- experiment.py: pretrain -> SFT -> annotate -> reward -> RL [-> DPO] on it, measured against gold
  (python -m ml.demo.experiment --quick).
"""
