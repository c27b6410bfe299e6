"""The LxN network (Umer et al., 2020) and its recipes in Keras, and Grad-CAM over it."""
