"""Which files a process opens: proof that the coordinator's process never reads a site's cases."""

import sys


class OpenedFiles:
    """Files this process opens or lists under ``root`` while ``recording`` (an audit hook sees every
    open, whatever library makes it)."""

    def __init__(self, root):
        self.root, self.paths, self.recording = str(root), [], False
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.recording and event in ("open", "os.listdir", "os.scandir") and args and \
                isinstance(args[0], str) and args[0].startswith(self.root):
            self.paths.append(args[0])
