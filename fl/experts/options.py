"""The choices the command line offers for a user's experts, declared without torch so that ``--help`` and the
parser are built before any model library is imported."""

VOCAB_MODES = ("first", "union")  # the merged model's vocabulary: the first expert's, or the union (WordPiece only)
