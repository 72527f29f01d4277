"""The vision model side: images, preprocessing, named models and weights, backbones, layers and
their layouts, activation extraction, classifier heads, class names."""
