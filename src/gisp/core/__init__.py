"""The method's model-agnostic parts: structures and masks, importance, ranking, schedules, objectives, data."""
