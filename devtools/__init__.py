"""Development tooling around the service, never part of the image (.dockerignore): the tiny checkpoint
writer, the Cog server launcher the tests and the demo share, cog 0.23.1's build and schema rules
ported from its Go source, and the logic behind script/deploy, script/download-weights and
script/openapi-schema. Nothing here is imported by glm/ or predict.py; the package itself imports
nothing, so that script/deploy runs it with any python3 (standard library only)."""
