"""potstill: knowledge distillation — train a small student to reproduce a large teacher."""

from .config import Recipe, RecipeError
from .objective import Objective, Term
from .recipes import load_recipe

__version__ = "0.1.0"

__all__ = ["Objective", "Recipe", "RecipeError", "Term", "__version__", "load_recipe"]
