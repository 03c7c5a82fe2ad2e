"""The course's shared code: what one lesson builds and later lessons import.

One concept per module (see README's lesson map):
    utils.env           seeding, thread count, quiet libraries, environment report   (lesson 00)
    utils.models        load_chat_model(), load_embedder(): the offline, verified models (lesson 00)
    utils.data          python_docs(), shakespeare(), the course's own data sets        (lesson 00)
Modules are imported explicitly (`from utils.models import load_chat_model`) so that importing
`utils` itself stays instant.
"""

__version__ = "0.1.0"
