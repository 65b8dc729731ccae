"""Services composing the layers below: pipeline, monitor, replay, evaluation, training."""
