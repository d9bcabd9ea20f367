"""STARS platform: train and evaluate looped language models (LoopLMs).

Subpackages: `stars.model` (LoopLM), `stars.objective` (loop samplers, JSRR, STARS loss),
`stars.tasks` (data and scoring), `stars.ray_backend` (everything that touches Ray).
Importing `stars` itself is cheap: it imports neither torch nor ray.
"""

__version__ = "0.1.0"
