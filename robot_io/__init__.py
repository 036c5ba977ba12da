"""Robots as first-class resources (registry, discovery, robot servers, drivers). Filled in by the robot_io issue."""
