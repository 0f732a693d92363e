"""The answer wing: from a hook request and the patient record to what the service says.

    rating.py    which orders to rate, and their facts and decisions (renders nothing)
    policy.py    the alert policy: which card, if any, an order gets (a pure function)
    cards.py     a card from the templates of its kind: the context, suggestions, the app link
    payloads.py  the FHIR and PAMA payloads: rating extensions, replacement orders, the body
    published.py the Questionnaire and CodeSystems the service publishes

:class:`cds_service.engine.Engine` puts them together for the routes and the command line.
"""
