"""Ray Serve: the champion as an authenticated, autoscaling HTTP endpoint with a page."""
