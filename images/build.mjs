console.error('image build: not yet')
