"""The real-audio puzzle suite (issue 15): speech, music and sound scenes composed from real recordings."""
