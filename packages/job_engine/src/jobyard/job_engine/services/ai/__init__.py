"""Helpers of the `ai.generate` job: the Gemini client and the database-backed call limiter."""
