"""TensorBoard scalars and text without TensorFlow: tensorboard's own event-file writer (what torch uses)."""
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class SummaryWriter:
    """`writer.scalars(step, {"train/loss": 3.2, ...})`; view with `tensorboard --logdir $JAXCHAT_BASE_DIR/runs`."""

    def __init__(self, logdir):
        self.writer = EventFileWriter(logdir)

    def scalars(self, step, values):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self.writer.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=summary))

    def text(self, step, tag, text):
        from tensorboard.plugins.text.summary_v2 import text_pb
        self.writer.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=text_pb(tag, text)))

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()
