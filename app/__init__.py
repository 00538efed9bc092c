"""Command-line programs (absl): train, evaluate, predict, export, visualize."""
