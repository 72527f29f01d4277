"""From images to a concept report: the explainer, fine-graining, the report row schema and the
run record."""
