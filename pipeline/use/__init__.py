"""Backbone + trained head as one classifier: model (rebuild from a run), predict, export, finetune."""
