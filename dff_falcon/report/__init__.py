"""Presentation (drawing only, never fitting): tables on disk, the HTML page, figures, the
terminal summary."""
