import asyncio

from bench.run import main
from sequencer.temporal import exit_without_teardown

if __name__ == "__main__":
    asyncio.run(main())
    # The SDK's runtime can abort the interpreter during teardown at exit, so leave without it.
    exit_without_teardown(0)
