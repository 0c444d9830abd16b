"""One small module per model family: how it lays out tokens (installed as sagevideo.pipelines)."""
