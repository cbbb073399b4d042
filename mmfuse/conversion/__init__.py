"""Command-line tools that build mmfuse folders: compose, convert and push."""
